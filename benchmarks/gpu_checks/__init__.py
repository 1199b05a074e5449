"""The checks behind ``benchmarks/gpu_check.py``, one module per job (the script is the driver).

- :mod:`.checkout`: ``dmpo_edge`` importable from this checkout (runs first);
- :mod:`.report`: rows, statuses, the table and the JSON;
- :mod:`.environment`: GPU, packages, toolkit, who sees CUDA;
- :mod:`.kit`: the offline kit (``benchmarks/gpu_kit.sh``): checkpoint and bundles, pycuda built from source,
  small wheels, the TensorRT lean runtime wheels;
- :mod:`.bundles`: the bundles under check and their inputs;
- :mod:`.reference`: the CPU reference, comparisons and tolerances;
- :mod:`.host_device`: the device interface on host memory (dry run);
- :mod:`.device`: the runtime's device layer on the GPU (copies, events, CUDA graph capture and replay,
  refill copies);
- :mod:`.regroup`: the survivor gather on the device (torch, a TensorRT Gather engine);
- :mod:`.pipelines`: the early-exit pipeline on the CPU and on the GPU through :mod:`.torch_backend`;
- :mod:`.engines`: TensorRT engines, the lean runtime, parity, the TensorRT pipeline.
"""
