from medmim.errors import MedmimError

__all__ = ["MedmimError", "__version__"]
__version__ = "0.1.0"
