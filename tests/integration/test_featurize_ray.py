"""Ray Data featurisation writes the same feature store as the local path, in the same order."""

from __future__ import annotations

import numpy as np
import pytest

from itmatch.data.store import prepare

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def test_ray_data_features_equal_local(tmp_path):
    import ray

    from trainers.featurize import ray_image_featurizer

    source = f"synthetic:{tmp_path / 'shapes'}?n_images=60"
    local = prepare(source, cache_dir=tmp_path / "local", image_encoder="pixels", text_encoder="hashing",
                    progress=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "lo"}})
    try:
        distributed = prepare(source, cache_dir=tmp_path / "ray", image_encoder="pixels", text_encoder="hashing",
                              progress=False, image_featurizer=ray_image_featurizer(actors=2, batch_size=7))
    finally:
        ray.shutdown()
    assert distributed.manifest["digests"] == local.manifest["digests"]  # ids and features, in order
    for split in local.manifest["splits"]:
        a, b = local.split(split), distributed.split(split)
        np.testing.assert_array_equal(a.image_ids, b.image_ids)
        np.testing.assert_allclose(a.image_feats, b.image_feats, rtol=1e-6)
