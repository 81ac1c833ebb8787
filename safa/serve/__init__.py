"""``safa serve``: a web page (Gradio) for long-form generation and ``safa evaluate``.

- :mod:`safa.serve.jobs`: requests checked field by field, the served model one request at a
  time, each request on a worker thread that reports progress and stops when cancelled (no
  Gradio import);
- :mod:`safa.serve.app`: the page (``build_app``, ``launch``).

Needs the ``serve`` extra (``pip install -e ".[serve]"``: gradio); ``make serve`` installs it.
"""
