"""Model specs -> ready classifiers (:mod:`model_zoo.zoo`). This module stays import-light: the CLI catches
:class:`ZooError` without importing torch."""


class ZooError(ValueError):
    """A model spec that cannot be turned into a model; the message names what was looked for."""
