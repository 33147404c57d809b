"""vitport: bring vision-transformer encoders to new hardware, and prove the port faithful and fast."""

from vitport.encoder import Encoder, Features, TokenLayout
from vitport.families import load

__all__ = ["Encoder", "Features", "TokenLayout", "load"]
__version__ = "0.1.0"
