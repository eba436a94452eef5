"""Methods: how a structure is found. Learned (hiap, sss with its APG optimizer), one-shot by an
importance criterion (criteria, oneshot), and the pipeline behind ``pyengine prune``."""
