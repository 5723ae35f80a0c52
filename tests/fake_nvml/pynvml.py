"""A stand-in for the `pynvml` binding with two cards and fixed readings, so a test can
pretend there is a driver: put this folder first on a worker's PYTHONPATH, or load it
in place of `pynvml` in sys.modules. Card 1 refuses its power reading, as some vGPU
setups do."""

NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    pass


class _Memory:
    def __init__(self, used: int, total: int) -> None:
        self.used, self.total, self.free = used, total, total - used


class _Utilization:
    def __init__(self, gpu: int) -> None:
        self.gpu, self.memory = gpu, 0


CARDS = [
    # uuid, name, memory used, memory total, utilisation %, °C, mW
    ("GPU-fake-0000", "Fake H100", 40 * 2**30, 80 * 2**30, 75, 61, 350_000),
    ("GPU-fake-0001", "Fake H100", 10 * 2**30, 80 * 2**30, 20, 45, None),
]


def nvmlInit():
    pass


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return len(CARDS)


def nvmlDeviceGetHandleByIndex(index):
    if not 0 <= index < len(CARDS):
        raise NVMLError("Invalid Argument")
    return index


def nvmlDeviceGetUUID(handle):
    return CARDS[handle][0]


def nvmlDeviceGetName(handle):
    return CARDS[handle][1]


def nvmlDeviceGetMemoryInfo(handle):
    return _Memory(CARDS[handle][2], CARDS[handle][3])


def nvmlDeviceGetUtilizationRates(handle):
    return _Utilization(CARDS[handle][4])


def nvmlDeviceGetTemperature(handle, sensor):
    return CARDS[handle][5]


def nvmlDeviceGetPowerUsage(handle):
    if CARDS[handle][6] is None:
        raise NVMLError("Not Supported")
    return CARDS[handle][6]
