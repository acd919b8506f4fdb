"""Sequential freezing (being built)."""


class SequentialFreezer:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("SequentialFreezer is being built")
