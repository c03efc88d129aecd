from recipes.default_model.budgets import markdown_table
from vlmzip.default_model.data import QUESTION_TYPES


def test_table_reports_retention_against_all_tokens():
    row = {t: 0.5 for t in QUESTION_TYPES}
    results = {"full@577": {**row, "overall": 0.5}, "visionzip@64": {**row, "overall": 0.4}}
    lines = markdown_table(results).splitlines()
    assert lines[0].startswith("| setting | tokens | overall | retained |")
    assert lines[2].startswith("| full | 577 | **50.0** | 100.0 % |")
    assert lines[3].startswith("| visionzip | 64 | **40.0** | 80.0 % |")


def test_bad_budgets_and_methods_fail_before_any_model_runs():
    import pytest

    from recipes.default_model.analysis import analyse
    from recipes.default_model.budgets import evaluate_budgets
    from vlmzip.default_model import data

    records = data.test_split(num_images=1)
    with pytest.raises(ValueError, match="dominant"):
        evaluate_budgets(None, None, records, budgets=((0, 10),))
    with pytest.raises(ValueError, match="method must be one of"):
        evaluate_budgets(None, None, records, methods=("nope",))
    with pytest.raises(ValueError, match="contextual"):
        analyse(None, None, records, dominant=54, contextual=-1)
    with pytest.raises(ValueError, match="images_per_batch"):
        analyse(None, None, records, images_per_batch=0)
