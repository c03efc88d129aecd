from visionzip.default_model.budgets import markdown_table
from visionzip.default_model.data import QUESTION_TYPES


def test_table_reports_retention_against_all_tokens():
    row = {t: 0.5 for t in QUESTION_TYPES}
    results = {"full@577": {**row, "overall": 0.5}, "visionzip@64": {**row, "overall": 0.4}}
    lines = markdown_table(results).splitlines()
    assert lines[0].startswith("| setting | tokens | overall | retained |")
    assert lines[2].startswith("| full | 577 | **50.0** | 100.0 % |")
    assert lines[3].startswith("| visionzip | 64 | **40.0** | 80.0 % |")
