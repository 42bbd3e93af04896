"""`python -m msclip COMMAND ...`: the `msclip` console script as a module, for launchers that take a
module, e.g. `torchrun --nproc_per_node 8 -m msclip train --config RECIPE.yaml`."""
import sys

from msclip.cli import main

sys.exit(main())
