"""Meta's other checkpoint formats (Llama 3.1 405B FP8 and MP16, Llama 3.2 INT4_EO8) as faithful
miniatures: converted at several world sizes and run at several TP degrees against references
computed here from the same files."""

import subprocess
import sys

from helpers import REPO


def test_model_args_need_no_quantization_module():
    """llama.args and llama.quantize import each other no more: the scheme belongs to quantize."""
    probe = "import sys, llama.args; assert 'llama.quantize' not in sys.modules, 'llama.args imports llama.quantize'"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO).returncode == 0
