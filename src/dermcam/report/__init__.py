"""The self-contained HTML report of an evaluation: one file a person can open, read and send on.

``report.html`` sits beside what ``evaluate --out`` writes (metrics.json, predictions.csv, the PNGs)
and is built from those files plus the checkpoint (for the Grad-CAM overlays of its gallery), so it can
be regenerated at any time without evaluating again. It sits above both ``evaluate`` and ``explain``
(it shows what each measured), which is why it is its own package: ``evaluate`` may not import
``explain``, and training, ``dermcam evaluate --out`` and ``dermcam report`` call it from above.

- :mod:`dermcam.report.html`     escaping, data: URIs, tables and figures: the page's building blocks
- :mod:`dermcam.report.sections` one function per section of the page
- :mod:`dermcam.report.gallery`  the most confident errors and some correct cases, with their CAMs
- :mod:`dermcam.report.build`    gathering the inputs, writing report.html; ``dermcam report``
"""
