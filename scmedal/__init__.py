__version__ = "0.1.0"

from . import data, datasets, metrics
from . import plotting as pl
from .model import SCMEDAL
