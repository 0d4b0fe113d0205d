import dagster as dg

from pipelines.definitions import build_definitions, defs

STAGES = ["raw_samples", "clean_samples", "tokenized_dataset", "lora_adapter", "evaluation_report", "merged_model"]


def test_definitions_load():
    dg.Definitions.validate_loadable(defs)


def test_graph_has_the_six_stages_in_order_and_base_model_upstream(tmp_path):
    repository = build_definitions(profile="smoke", home=str(tmp_path / "a"), data_dir=str(tmp_path / "d")).get_repository_def()
    graph = repository.asset_graph
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == set(STAGES) | {"base_model", "full_finetune_reference"}
    for upstream, downstream in zip(STAGES, STAGES[1:]):
        parents = {key.to_user_string() for key in graph.get(dg.AssetKey(downstream)).parent_keys}
        assert upstream in parents, f"{upstream} -> {downstream} missing"
    for downstream in ("tokenized_dataset", "lora_adapter", "merged_model"):
        assert dg.AssetKey("base_model") in graph.get(dg.AssetKey(downstream)).parent_keys


def test_every_asset_has_a_code_version():
    for asset in defs.assets:
        for spec in asset.specs:
            assert spec.code_version, spec.key


def test_remote_code_is_opted_into_from_the_environment_beside_the_base_model(tmp_path, monkeypatch):
    def base(**env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return build_definitions(profile="smoke", home=str(tmp_path / "a"), data_dir=str(tmp_path / "d")).resources["base"]

    assert base().trust_remote_code is False
    opted_in = base(VQA_BASE_MODEL="/models/cogvlm-chat-hf", VQA_TRUST_REMOTE_CODE="true")
    assert opted_in.trust_remote_code is True and opted_in.model_id == "/models/cogvlm-chat-hf"
