"""The real slice the network tests train on."""

import numpy as np
import pydicom
import pytest
import torch


@pytest.fixture(scope="session")
def mri_slice(shared_data) -> torch.Tensor:
    """A studyforrest T1 axial slice, (1, 1, 384, 274), min-max scaled to [0, 1]."""
    path = shared_data / "brain_mri_t1_axial_studyforrest" / "series" / "N2D_0190.dcm"
    img = torch.from_numpy(pydicom.dcmread(path).pixel_array.astype(np.float32))
    return ((img - img.min()) / (img.max() - img.min()))[None, None]
