"""itmatch: the core library (config, data, models, losses, evaluation).

It never imports ray, mlflow or deepspeed, so all of it runs and is tested on a CPU without a
cluster; those live in trainers/, tuning/ and cluster/.
"""

__version__ = "0.1.0"
