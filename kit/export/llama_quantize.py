"""llama.cpp's quantizer through llama-cpp-python, for machines without a llama-quantize binary; run as a script
in kit/export/gguf.py's logged subprocess (llama.cpp prints to the C-level stdout/stderr):

    python kit/export/llama_quantize.py SOURCE.gguf TARGET.gguf q4_k_m
"""

import ctypes
import sys


def main(source: str, target: str, quant: str) -> int:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + quant.upper())
    return llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
