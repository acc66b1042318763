"""Typed configs: one per stage, nested in one pipeline config, loaded from YAML.

A YAML file only needs the keys it changes; everything else takes the defaults of schema.py. Any key
can be overridden on the command line as ``section.key=value`` (``sft.lr=1e-4``). Unknown keys
and bad values are rejected with the file, line and dotted key named.

schema.py holds the typed configs and their size checks, loading.py reads YAML files and overrides
into them; the package holds their public names, which the stages import from here.
"""

from instructrl.config.loading import dump_config, load_config  # noqa: F401
from instructrl.config.schema import (  # noqa: F401
    CollectConfig,
    DataFormat,
    EvalConfig,
    LoRAConfig,
    MOVED_KEYS,
    ModelConfig,
    ModelSwitches,
    PPOConfig,
    PipelineConfig,
    PretrainConfig,
    RMConfig,
    RMFormat,
    RoundsConfig,
    RunConfig,
    SFTConfig,
    SFTFormat,
    TokenizerConfig,
    TrainConfig,
    WorldConfig,
    check_divisions,
    describe_fields,
    exact_div,
    in_run,
    section,
    spelt_in_run,
)
