"""The field's training recipe (TrainConfig: SGD, cosine schedule, random crop + flip, autocast on a GPU): the
augmentation is a crop of the zero-padded image, flipped or not; a model trained with it learns, the same for a
seed; the default recipe is untouched (bench grids keep their model keys)."""
from __future__ import annotations

import pytest
import torch

from netmend.errors import NetmendError
from netmend.train import RECIPE_DEFAULTS, TrainConfig, crop_flip, fit


def test_crop_flip_is_a_crop_of_the_padded_image_flipped_or_not():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8) + 0.1                      # no zeros: padding shows as zeros
    out = crop_flip(x, torch.Generator().manual_seed(1), pad=2)
    assert out.shape == x.shape and out.is_contiguous()
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(len(x)):
        views = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                 if torch.equal(out[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert views, f"sample {i} is not a (flipped) crop of its padded image"
        flips += views[0][2]
    assert 0 < flips < len(x)                              # some flipped, some not
    again = crop_flip(x, torch.Generator().manual_seed(1), pad=2)
    assert torch.equal(out, again)                         # the same draw for the same generator


def test_the_field_recipe_trains_a_model_the_same_way_twice(digits):
    from netmend.train import build_image_model

    idx = torch.arange(600)
    x, y = digits.x_train[idx], digits.y_train[idx]
    cfg = TrainConfig(epochs=6, batch_size=64, lr=0.05, weight_decay=5e-4, optimizer="sgd", seed=3,
                      schedule="cosine", augment="crop-flip", amp=True)        # amp: ignored on the CPU
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model, _ = build_image_model("small-cnn", digits)
        models.append(fit(model, x, y, cfg))
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    acc = float((models[0](digits.x_test).argmax(1) == digits.y_test).float().mean())
    assert acc > 0.5, acc                                  # ten classes: chance is 0.1


def test_the_default_recipe_is_netmends_fast_one():
    cfg = TrainConfig()
    assert {k: getattr(cfg, k) for k in RECIPE_DEFAULTS} == RECIPE_DEFAULTS
    assert (cfg.optimizer, cfg.schedule, cfg.augment) == ("adam", "constant", "none")


@pytest.mark.parametrize("field, value, fragment", [("schedule", "step", "schedule must be one of constant, cosine"),
                                                    ("augment", "mixup", "augment must be one of none, crop-flip")])
def test_an_unknown_schedule_or_augmentation_is_one_line(digits, field, value, fragment):
    from netmend.train import build_image_model

    model, _ = build_image_model("small-cnn", digits)
    with pytest.raises(NetmendError) as err:
        fit(model, digits.x_train[:8], digits.y_train[:8], TrainConfig(epochs=1, **{field: value}))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_grid_naming_the_field_recipe_gets_its_own_model_key_and_hash(tmp_path):
    from netmend.bench import load_grid

    base = ('title = "t"\nseeds = [0]\ndatasets = ["digits"]\narchs = ["small-cnn"]\n[attacks.badnets]\nsize = 2\n'
            '[train]\nepochs = 2\n{extra}[methods.finetune]\n')
    keys = {}
    for name, extra in (("plain", ""), ("defaults named", 'schedule = "constant"\naugment = "none"\namp = false\n'),
                        ("field", 'optimizer = "sgd"\nschedule = "cosine"\naugment = "crop-flip"\n')):
        (tmp_path / f"{len(keys)}.toml").write_text(base.format(extra=extra))
        plan = load_grid(tmp_path / f"{len(keys)}.toml")
        keys[name] = (plan.cells[0].model_key, plan.models[plan.cells[0].model_key]["train"]["train"], plan.hash)
    assert keys["plain"][0] == keys["defaults named"][0]    # naming the defaults changes nothing:
    assert keys["plain"][2] == keys["defaults named"][2]    # neither the model key nor the grid's hash
    assert keys["field"][2] != keys["plain"][2]
    assert "augment" not in keys["plain"][1] and "schedule" not in keys["plain"][1]
    assert keys["field"][0] != keys["plain"][0] and keys["field"][1]["augment"] == "crop-flip"


def test_crop_flip_on_data_that_are_not_images_is_one_line():
    model = torch.nn.Linear(6, 2)
    with pytest.raises(NetmendError) as err:
        fit(model, torch.randn(8, 6), torch.randint(0, 2, (8,)), TrainConfig(epochs=1, augment="crop-flip"))
    assert "augment='crop-flip' needs images (N, C, H, W)" in str(err.value) and "\n" not in str(err.value)
