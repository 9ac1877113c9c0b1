"""Detectors: scores of how suspicious an input is, served by the ``libnet_consistency_detector`` hook.

Every detector here is served by the built-in plugin (:mod:`libnet_plugin.builtins`) through the same
hook as any third-party one, and :class:`~libnet_plugin.ConsistencyDetector` builds any of them by name.
The contract is :class:`ConsistencyScore` (:mod:`.api`), what a score may use of the network is
:class:`FittedNetwork`; one module per method. None of them sees an attacked input: they are fitted on training data (or on the fitted library
network alone) and calibrated on clean data only.

=======================  ==========================================================================  ========
name                     score (higher = more suspicious)                                            needs
=======================  ==========================================================================  ========
``"cpl"``                ``1 - CPL`` (Eq. 5): the consistency of the layers' predictions from their  net only
                         ``top_k`` library nodes (the paper's score; module :mod:`.cpl`)
``"library-margin"``     per layer: margin between the library nodes of the model's answer class     net only
                         and the nodes of the other classes, and the residual of the activation
                         after reconstruction from its nearest nodes; conformal p-values on clean
                         data, fused over layers with Fisher's method
``"library-distance"``   per layer: Mahalanobis distance of the normalised activation (channel       net only
                         means for convolution layers) to the mean of the library nodes of the
                         model's answer class, within-class covariance of the nodes; conformal
                         p-values fused over layers with Fisher's method (``"library-margin"`` with
                         ``features=("distance",)``)
``"library-fusion"``     the default: ``"library-distance"`` plus the model's confidence             net only
                         (``1 - max softmax``) and logit margin as two more conformal p-values, all
                         fused with Fisher's method (module :mod:`.library_fusion`)
``"msp"``                ``1 - max softmax(output)`` (Hendrycks & Gimpel, 2017)                      nothing
``"mahalanobis"``        per layer: the smallest Mahalanobis distance to a class mean (classes by    train
                         the model's answers, one shared covariance; conv layers averaged over
                         positions as in Lee et al., 2018); conformal p-values fused over layers
                         (no logistic regression on attacks)
``"knn"``                deep k-NN (Papernot & McDaniel, 2018): number of the ``k`` nearest          train
                         training activations, summed over layers, whose label differs from the
                         model's answer
=======================  ==========================================================================  ========

Today's post-hoc peers, one module each, written from their papers (higher = more suspicious; they read
the logits and the penultimate features, the input of the model's last linear layer taken from a probed
layer, as :mod:`._posthoc` describes):

- ``"energy"``: ``-logsumexp(z)`` of the logits ``z`` (Liu et al., 2020; needs nothing).
- ``"maxlogit"``: ``-max_c z_c`` (Hendrycks et al., 2022; nothing).
- ``"gen"``: generalized entropy of the top softmax probabilities (Liu et al., 2023; nothing).
- ``"react-energy"``: energy of the logits recomputed from the penultimate activations clipped at their
  90th training percentile (Sun et al., 2021; train).
- ``"vim"``: the virtual logit, the penultimate feature's norm off its principal training subspace, scaled,
  minus the energy (Wang et al., 2022; train).
- ``"knn-normalized"``: distance to the k-th nearest L2-normalised penultimate training feature, ``k`` the
  training-set size / 1000 (Sun et al., 2022; train).
- ``"mahalanobis-multilayer"``: Lee et al.'s per-layer class Gaussians (training labels, tied covariance),
  the layers combined by z-scores on the training inputs instead of a regression on attacks (Lee et al.,
  2018; train).

Scores that combine several per-layer features (:class:`FusedLayerScore`) turn each feature into a
conformal p-value against clean reference data given at calibration
(:meth:`FusedLayerScore.set_reference`) and fuse them with Fisher's method, ``-sum log p``.

For a model whose layers nobody named, :func:`fusion_recipe` gives the keywords of
``ConsistencyDetector.from_model`` that build ``"library-gaussian-fusion"`` on layers found by rule (the
stem's output and ``layers="auto"``'s block outputs), as measured on the MNIST net (issue 28, round 10).

Third-party detectors plug in the same way: a plugin with a ``libnet_consistency_detector`` hookimpl
that returns a :class:`ConsistencyScore` (or any object with ``name``, ``fit(net, data)`` and
``score(net, probe_result)``). A plugin lists the detectors it wants in the comparison of ``libnet
evaluate-detectors`` through the ``libnet_detector_comparison`` hook (see
:func:`libnet_plugin.plugins.registered_detectors`).

Example:
    >>> from libnet_plugin.plugins import make_detector
    >>> make_detector("knn", {"k": 5})
    DeepKNNScore(k=5, layers=None, labels='auto')
"""

from ._features import node_classes
from ._posthoc import PeerNotApplicableError, logits_of
from .api import ConsistencyScore, FittedNetwork, FusedLayerScore, PluginScore, ScoreLike, as_consistency_score
from .conformal import ConformalFusion
from .cpl import CPLScore
from .energy import EnergyScore
from .gen import GENScore
from .knn import DeepKNNScore
from .knn_normalized import KNNNormalizedScore
from .library_fusion import LibraryFusionScore
from .library_gaussian_fusion import LibraryGaussianFusionScore
from .library_margin import LibraryDistanceScore, LibraryMarginScore
from .mahalanobis import MahalanobisScore
from .mahalanobis_multilayer import MultiLayerMahalanobisScore
from .maxlogit import MaxLogitScore
from .msp import MaxSoftmaxScore
from .react_energy import ReActEnergyScore
from .recipe import FUSION_SETTINGS, fusion_recipe
from .vim import ViMScore

#: Development candidates for the default detector on the MNIST net of ``libnet evaluate-detectors`` (issue 28),
#: taken by label with ``--detectors`` (never in the default list): the library and Gaussian features on the
#: net's post-activation block outputs, which no module returns (layer specs, :func:`~libnet_plugin.probe.parse_layer_spec`):
#: ``conv2:input`` (conv1's block after ReLU and pooling), ``fc1:input`` (conv2's, flattened) and ``fc2:input``
#: (fc1 after ReLU, the penultimate features). ``evaluate-detectors`` probes the layers they name besides its own.
MNIST_POST_LAYERS = ["conv2:input", "fc1:input", "fc2:input"]
MNIST_CANDIDATES: dict[str, tuple[str, dict]] = {
    "library-fusion (post)": ("library-fusion", {"layers": MNIST_POST_LAYERS}),
    "library-fusion (all+post)": ("library-fusion", {"layers": ["conv1", "conv2", "fc1", "fc2", *MNIST_POST_LAYERS]}),
    "library-gaussian-fusion (post)": ("library-gaussian-fusion", {"layers": MNIST_POST_LAYERS}),
    "library-gaussian-fusion (lib, gauss post)": ("library-gaussian-fusion", {
        "layers": ["conv1", "conv2", "fc1", "fc2"], "gaussian_layers": MNIST_POST_LAYERS}),
    "library-gaussian-fusion (post, weighted)": ("library-gaussian-fusion", {"layers": MNIST_POST_LAYERS,
                                                                             "combine": "weighted"}),
    # conformal p-values with an exponential tail beyond the clean range (round 2, after dev seed 1)
    "library-fusion (conv1, conv2; tail)": ("library-fusion", {"layers": ["conv1", "conv2"], "tail": "exponential"}),
    "library-gaussian-fusion (conv1, conv2; gauss post; tail)": ("library-gaussian-fusion", {
        "layers": ["conv1", "conv2"], "gaussian_layers": MNIST_POST_LAYERS, "tail": "exponential"}),
    "library-gaussian-fusion (conv1, conv2; gauss conv2:input; tail)": ("library-gaussian-fusion", {
        "layers": ["conv1", "conv2"], "gaussian_layers": ["conv2:input"], "tail": "exponential"}),
    "library-gaussian-fusion (all; gauss post; tail)": ("library-gaussian-fusion", {
        "layers": ["conv1", "conv2", "fc1", "fc2"], "gaussian_layers": MNIST_POST_LAYERS, "tail": "exponential"}),
    # round 3, after dev seeds 1 and 2 of round 2 (rotated digits still behind ViM)
    "library-gaussian-fusion (conv1, conv2; gauss conv2:input, fc2:input; tail)": ("library-gaussian-fusion", {
        "layers": ["conv1", "conv2"], "gaussian_layers": ["conv2:input", "fc2:input"], "tail": "exponential"}),
    "library-gaussian-fusion (conv1, conv2; gauss conv2:input, fc1:input; tail)": ("library-gaussian-fusion", {
        "layers": ["conv1", "conv2"], "gaussian_layers": ["conv2:input", "fc1:input"], "tail": "exponential"}),
    # round 5 (dev seeds 1-4, issue 28): class Gaussians on conv1 and conv2:input, and ViM's score as a feature
    "library-gaussian-fusion (conv1, conv2; gauss conv1, conv2:input; vim; tail)": ("library-gaussian-fusion", {
        "layers": ["conv1", "conv2"], "gaussian_layers": ["conv1", "conv2:input"], "peers": ["vim"],
        "tail": "exponential"}),
    # round 8 (dev seeds 1-4): the truncated product (tau 0.1), so typical features do not dilute extreme ones,
    # with the class Gaussian after fc1's ReLU too
    "library-gaussian-fusion (conv1, conv2; gauss conv1, conv2:input, fc1:input; vim; truncated 0.1; tail)": (
        "library-gaussian-fusion", {"layers": ["conv1", "conv2"], "gaussian_layers": ["conv1", "conv2:input", "fc1:input"],
                                    "peers": ["vim"], "combine": "truncated", "truncation": 0.1,
                                    "tail": "exponential"}),
    # round 10 (dev seeds 1-4): round 8's fusion on layers any model has, the first parametrised module's output
    # and the first two of layers="auto"'s block outputs (detectors.fusion_recipe)
    "library-gaussian-fusion (generic: conv1, conv2:input, fc1:input; vim; truncated 0.1; tail)": (
        "library-gaussian-fusion", {"layers": ["conv1", "conv2:input", "fc1:input"],
                                    "gaussian_layers": ["conv1", "conv2:input", "fc1:input"],
                                    "peers": ["vim"], "combine": "truncated", "truncation": 0.1,
                                    "tail": "exponential"}),
    # Lee et al.'s score on the post-activation block outputs, as the paper probes them: a peer, for a fair check
    "mahalanobis-multilayer (post)": ("mahalanobis-multilayer", {"layers": MNIST_POST_LAYERS}),
}

__all__ = [
    "ConsistencyScore", "FittedNetwork", "FusedLayerScore", "PluginScore", "ScoreLike", "as_consistency_score",
    "ConformalFusion", "CPLScore", "LibraryMarginScore", "LibraryDistanceScore", "LibraryFusionScore", "MaxSoftmaxScore",
    "MahalanobisScore", "DeepKNNScore", "node_classes", "EnergyScore", "MaxLogitScore", "GENScore", "ReActEnergyScore",
    "ViMScore", "KNNNormalizedScore", "MultiLayerMahalanobisScore", "PeerNotApplicableError", "logits_of",
    "LibraryGaussianFusionScore", "MNIST_CANDIDATES", "FUSION_SETTINGS", "fusion_recipe",
]
