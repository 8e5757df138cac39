"""DHE-VPR model package, bottom up:

- `cct`, `features_extractor`: the CCT backbone and the features extractor (global descriptors, local features),
  which owns `PATCH_SIZE`;
- `dhe`: the DHE head and the correlation volume it reads;
- `geometry`: patch keypoints, the DLT of the regressed points, reprojection errors;
- `refit`, `ransac`: the batched clone of OpenCV's `findHomography(RANSAC)` and its refit;
- `matching`: mutual matches, the test-time inlier score and the REI training loss;
- `precision`: the `--amp` policy and the optional `torch.compile` of the head;
- `rerank`: the one correlation -> head -> DLT chain (`predict_homographies`) and the batched re-ranking;
- `files`, `checkpoints`: atomic file writes, and checkpoints in the original's formats.
"""

from model.cct import CCT, cct_14_7x2_384
from model.dhe import HomographyRegression, compute_similarity
from model.features_extractor import FeaturesExtractor

__all__ = ["CCT", "cct_14_7x2_384", "FeaturesExtractor", "HomographyRegression", "compute_similarity"]
