"""quantpipe: the library behind the quantization DAG.

One subpackage per stage: ``prep`` (1), ``calibration`` (2), ``quantization`` (3),
``validation`` (4), ``deployment`` (5), ``monitoring`` (6). ``assets`` obtains the
offline model and corpus; ``artifacts`` stores results atomically with manifests.
Nothing here imports Airflow.
"""

__version__ = "0.1.0"
