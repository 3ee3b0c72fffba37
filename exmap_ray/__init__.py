"""exmap-ray: ExMap (Chakraborty, Sletten & Kampffmeyer, CVPR 2024) as a Ray experiment engine.

    exmap-ray run tune_specs/cmnist.yaml
"""
__version__ = "0.1.0"
