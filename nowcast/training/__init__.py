"""The parts of the training loop (:mod:`nowcast.train` runs them): the ``train:`` section,
set-up helpers and one optimisation step."""
