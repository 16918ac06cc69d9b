"""``uvicorn app:app``: parley as its own server, configured from the environment (PARLEY_*).

This module is the application entry, not part of the installed package: it alone reads the environment, sets up
logging and metrics for the process, and exits with one line on a bad setting. A host app embeds
``parley.create_app()`` instead, which does none of that.
"""

from __future__ import annotations

from parley import serve_from_environment

app = serve_from_environment()
