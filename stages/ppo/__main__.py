"""`python -m stages.ppo --config FILE [--force]` (also under the DeepSpeed launcher)."""

import sys

from stages.lifecycle.entry import stage_main
from stages.ppo.recipe import run

sys.exit(stage_main("ppo", run))
