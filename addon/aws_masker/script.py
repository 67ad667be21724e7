"""mitmproxy entry script for installs without a checkout (pip install of a wheel or URL)::

    mitmdump -s "$(python -c 'import aws_masker.script as s; print(s.__file__)')"

A checkout uses ``addon/masker.py`` instead; both load the same addon.
"""

from aws_masker.addon import AwsMasker

addons = [AwsMasker()]
