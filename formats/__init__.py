"""Number formats: pure tensor -> tensor numerics, packing and a registry.

    from lpc.formats import get_format, list_formats
    f = get_format("nvfp4")
    q = f.quantize(w, scale_search=2)
    w2 = f.dequantize(q)
"""
from lpc.formats.errors import FormatError, LpcError
from lpc.formats.qtensor import QTensor, stored_bits
from lpc.formats.registry import Format, FormatSpec, get_format, list_formats, register

# One import line per format: importing registers it.
from lpc.formats import nvfp4  # noqa: E402,F401
from lpc.formats import fp8_e4m3  # noqa: E402,F401
from lpc.formats import bf16  # noqa: E402,F401
from lpc.formats import fp8_e5m2  # noqa: E402,F401
from lpc.formats import fgmp  # noqa: E402,F401
from lpc.formats import mxfp4  # noqa: E402,F401
from lpc.formats import mxfp8  # noqa: E402,F401
from lpc.formats import bcq  # noqa: E402,F401
from lpc.formats import int  # noqa: E402,F401  (shadows the builtin in this namespace only)

__all__ = ["Format", "FormatError", "FormatSpec", "LpcError", "QTensor", "get_format",
           "list_formats", "register", "stored_bits"]
