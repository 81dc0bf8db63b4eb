"""Each set of choices, declared once, as scikit-learn's ``_parameter_constraints`` declares them.

The options' types in :mod:`featx.config.settings` are derived from these tuples (``Literal[KERNELS]``),
so the command-line choices, the ``--config`` check and ``configs/default.yaml`` follow them; the code
that checks a value (the heads, the embedding, the audit) imports the tuple from here.
"""

from __future__ import annotations

KERNELS = ("linear", "rbf")  # the SVM's (rbf searches C and gamma)
HEAD_FORMATS = ("skops", "joblib")  # saved heads
SOLVERS = ("auto", "memory", "stream")  # how the linear heads and kNN train (auto: stream when rows do not fit)
TRAIN_VIEWS = ("auto", "on", "off")  # the probe's use of a cache's augmented training views
SEARCH_BACKENDS = ("torch", "faiss")  # exact neighbour search (the streamed kNN also takes auto)
TTAS = ("none", "flip")  # test-time augmentation of the stored parts
DTYPES = ("float32", "float16")  # features in a cache
ENGINES = ("auto", "cpu", "gpu")  # the embedding engine
RUNTIMES = ("auto", "torch", "openvino", "openvino-bf16")  # the network runtime on the CPU
EXECUTORS = ("local", "ray")  # where the embedding's chunks run
SPLITS = ("train", "val", "test")
EXPORT_FORMATS = ("parquet", "npy", "csv")
MODEL_FORMATS = ("onnx", "openvino")  # featx export-model: one ONNX graph, or OpenVINO IR (.xml + .bin)
QUANTIZE = ("none", "int8")  # export-model --quantize: int8 by NNCF post-training quantisation (OpenVINO IR)
