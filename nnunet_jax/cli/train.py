"""Train (or evaluate) nnU-Net: ``python train.py --data /data/01_3d --results /results --fold 0 --amp``.

Flags keep the seed's names and defaults (nnunet_jax/configs/default.py); ``--config file.py`` loads
another config whose fields can also be set as ``--config.<name>=value``. A seed flag given explicitly wins
over the config file.
"""

from nnunet_jax.platform import configure_xla_flags

configure_xla_flags()  # before JAX starts (oneDNN convolutions on CPU)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from nnunet_jax.cli import run_app  # noqa: E402
from nnunet_jax.configs.default import get_config  # noqa: E402
from nnunet_jax.configs.help import FLAG_HELP  # noqa: E402
from nnunet_jax.planning.presets import DEFAULT as DEFAULT_PRESET  # noqa: E402
from nnunet_jax.planning.presets import PRESETS  # noqa: E402

# The defaults as a file (ml_collections loads configs from files); experiment overlays import from it.
DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "default.py")
CHOICES = {"exec_mode": ["train", "evaluate"], "norm": ["instance", "batch", "group"],
           "scheduler": ["none", "multistep", "cosine", "plateau"], "optimizer": ["sgd", "radam", "adam"],
           "blend": ["gaussian", "constant"], "amp_dtype": ["bf16", "fp16"],
           "preset": [DEFAULT_PRESET, *PRESETS]}
INT_LISTS = ("steps", "filters")


def define_flags() -> None:
    """``--config`` and one absl flag per config field, same name and default."""
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG,
                                    "ml_collections config file; its fields can be set as "
                                    "--config.<name>=value")
    for name, value in get_config().items():
        help_ = FLAG_HELP.get(name, "")
        if name in CHOICES:
            flags.DEFINE_enum(name, value, CHOICES[name], help_)
        elif name in INT_LISTS:
            flags.DEFINE_list(name, [str(v) for v in value], help_)
        elif isinstance(value, bool):
            flags.DEFINE_bool(name, value, help_)
        elif isinstance(value, int):
            flags.DEFINE_integer(name, value, help_)
        elif isinstance(value, float):
            flags.DEFINE_float(name, value, help_)
        else:
            flags.DEFINE_string(name, str(value), help_)


FLAGS = flags.FLAGS


def build_config():
    """The config file's values overridden by the seed flags given on the command line."""
    config = FLAGS.config
    for name in get_config():
        if FLAGS[name].present:
            value = FLAGS[name].value
            if name in INT_LISTS:
                value = tuple(int(v) for v in value)
            setattr(config, name, value)
    if not FLAGS["task"].present and config.task == get_config().task:
        config.task = ""  # no --task: a preprocessed --data folder's plan decides (loop.task_matches)
    if config.preset != DEFAULT_PRESET and not FLAGS["batch_size"].present \
            and config.batch_size == get_config().batch_size:
        config.batch_size = 0  # the preset plans it (planning.presets.apply_preset)
    return config


def main(argv: list[str]) -> int:
    del argv
    from nnunet_jax.training import loop

    try:
        summary = loop.train_and_evaluate(build_config())
    except loop.TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print({k: v for k, v in summary.items() if k != "dice"})
    return 0


def run() -> None:
    """Console entry point."""
    run_app(main, define_flags, __name__)


if __name__ == "__main__":
    run()
