"""The training loaders keep their worker processes between passes (a pass of a small datalist is a few batches;
re-forking the workers each pass made the paper preset's diffusion training 1.7x slower on an H100), and ask
for none with ``num_workers: 0``, which torch's DataLoader would refuse."""

import pytest

from diffdenoise.stages import stage_parser


@pytest.mark.parametrize("stage", ["train_bsn", "train_diffusion", "train_student"])
@pytest.mark.parametrize("num_workers", [0, 4])
def test_training_loader_keeps_its_workers_exactly_when_it_has_some(stage, num_workers):
    parser = stage_parser(stage, [], num_workers=num_workers)
    assert parser.get_parsed_content("train#dataloader#persistent_workers") is (num_workers > 0)
