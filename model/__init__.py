"""DHE-VPR model package: CCT backbone, features extractor, DHE head, matching and checkpoint I/O."""

from model.cct import CCT, cct_14_7x2_384
from model.dhe import HomographyRegression, compute_similarity
from model.features_extractor import FeaturesExtractor

__all__ = ["CCT", "cct_14_7x2_384", "FeaturesExtractor", "HomographyRegression", "compute_similarity"]
