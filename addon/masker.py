"""mitmproxy entry script: ``mitmdump -s addon/masker.py``.

Loads the aws_masker package that sits beside this file, so it works with or without installing it.
"""

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.insert(0, _here)

from aws_masker.addon import AwsMasker  # noqa: E402

addons = [AwsMasker()]
