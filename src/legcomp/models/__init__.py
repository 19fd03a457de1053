"""legcomp.models: the Attention-Res-V-Net and its weights files."""

from legcomp.models.network import (CONFIGS, AttentionResVNet, ResBlock, build_network, count_parameters,
                                    network_divisor, resolve_config)
from legcomp.models.weights import (DEFAULT_CHANNELS, bundled_weights, bundled_weights_dir, label_names,
                                    load_weights, read_weights_meta, save_weights, weights_file_name)

__all__ = ["CONFIGS", "DEFAULT_CHANNELS", "AttentionResVNet", "ResBlock", "build_network", "bundled_weights",
           "bundled_weights_dir", "count_parameters",
           "label_names", "load_weights", "network_divisor", "read_weights_meta", "resolve_config", "save_weights",
           "weights_file_name"]
