"""pytest-benchmark runs label their saved JSON with the device and the library versions (tests/bench/test_ops_bench.py)."""

import os
import platform


def pytest_benchmark_update_machine_info(config, machine_info):
    """Add what pytest-benchmark does not record itself: torch / triton versions, the device, torch's threads."""
    import torch

    machine_info["torch"] = torch.__version__
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    machine_info["machine"] = platform.machine()
