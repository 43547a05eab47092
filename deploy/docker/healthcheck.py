"""Container HEALTHCHECK: exit 0 when the server answers GET /health (liveness), else 1.

Plain standard library, so that the image needs no curl. The port is MATRYOSHKA_PORT (default 8000).
"""

import os
import sys
import urllib.request

port = os.environ.get("MATRYOSHKA_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:
    sys.exit(1)
