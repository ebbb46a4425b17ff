"""Drive ModelOpt's ``hf_ptq.py`` example the way its own command line does, without a shell script.

The seeds lost Runs 4-9 re-creating hf_ptq's entry point by hand: a constant taken from the wrong module,
a hand-built ``argparse.Namespace`` missing attributes, ``dataset=None``, the shell script's flag names,
and the skipped post-parse conversions of its ``if __name__ == "__main__":`` block. This driver does
what that block does and nothing else:

    locate -> import (its folder on sys.path) -> build argv with hf_ptq's OWN flag names -> hf_ptq's own
    ``parse_args()`` (sys.argv swapped in, restored after) -> the ``__main__`` conversions -> ``main(args)``

Everything version-specific comes from a recorded contract (``fixtures/hf_ptq_contract.json``):
the flags hf_ptq defines, the ``__main__`` conversions as data, and the attributes of ``args`` that
``main()`` and the functions it hands ``args`` to read. ``extract_contract`` regenerates it from a real
hf_ptq.py by reading its syntax tree (no import needed); ``resolve_runtime=True`` also imports it and
checks the live parser against the tree. The crosscheck tier compares a fresh extraction with the
recorded file, so a ModelOpt bump shows up as a diff instead of a failed seven-hour run.

This module imports nothing heavy; ModelOpt and transformers are imported only by hf_ptq itself.

The package, by concern:

options   HfPtqConfig (a run in our words), the recipes' qformats, OPTION_TABLE (our names -> hf_ptq's)
contract  the recorded contract: load_contract, contract_diff, ContractError
driver    locate -> import -> argv -> parse -> the __main__ conversions -> prepare / run (main(args))
extract   extract_contract: the contract from hf_ptq.py's syntax tree (flags, what main() reads)
main_block  the __main__ block's conversions and guards, from the same tree
runtime   the live check of the extracted contract against hf_ptq's own parser (imports ModelOpt)
__main__  `python -m pipeline.hf_ptq REPO`: regenerate fixtures/hf_ptq_contract.json
"""

from __future__ import annotations

from .contract import CONTRACT_PATH, CONTRACT_SCHEMA, ContractError, contract_diff, load_contract
from .driver import (
    HF_PTQ_LAYOUTS,
    _folder_on_sys_path,
    apply_main_conversions,
    build_argv,
    import_hf_ptq,
    kv_cache_qformat_choices,
    locate_hf_ptq,
    missing_main_attributes,
    parse,
    prepare,
    run,
)
from .extract import extract_contract
from .options import (
    NODE_CALIB_SIZE_LIMIT,
    OPTION_TABLE,
    RECIPE_QFORMAT,
    HfPtqConfig,
    config_for_recipe,
    seeds_config,
)

__all__ = [
    "CONTRACT_PATH",
    "CONTRACT_SCHEMA",
    "HF_PTQ_LAYOUTS",
    "NODE_CALIB_SIZE_LIMIT",
    "OPTION_TABLE",
    "RECIPE_QFORMAT",
    "ContractError",
    "HfPtqConfig",
    "_folder_on_sys_path",
    "apply_main_conversions",
    "build_argv",
    "config_for_recipe",
    "contract_diff",
    "extract_contract",
    "import_hf_ptq",
    "kv_cache_qformat_choices",
    "load_contract",
    "locate_hf_ptq",
    "missing_main_attributes",
    "parse",
    "prepare",
    "run",
    "seeds_config",
]
