from .architecture import ArchitectureSpec
from .config import CfgNode, ConfigError, get_cfg, load_config

__all__ = ["ArchitectureSpec", "CfgNode", "ConfigError", "get_cfg", "load_config"]
