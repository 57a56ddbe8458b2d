"""Calibration: the packaged text (:mod:`.corpus`), its token windows (:mod:`.tokens`), and running a model
one decoder layer at a time to capture each layer's inputs (:mod:`.layerwise`)."""
