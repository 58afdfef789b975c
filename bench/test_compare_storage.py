#!/usr/bin/env python3
"""Unit tests of compare-storage.py's answer check: it must fail on a
changed value, a missing or an extra row, and pass on the systems' different
notations of the same answer.  Run: python3 bench/test_compare_storage.py"""

import importlib.util
import os
import unittest

spec = importlib.util.spec_from_file_location(
    "compare_storage", os.path.join(os.path.dirname(__file__), "compare-storage.py"))
cs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cs)

TALLY = [["projects/p1", "2026-11-05T00:00:00Z", 12],
         ["projects/p2", "2026-11-05T00:00:00Z", 7.5]]
POSTGRES = [("projects/p1", "2026-11-05 00:00:00+00", "12"),
            ("projects/p2", "2026-11-05 00:00:00+00", "7.50")]
CLICKHOUSE = [("projects/p1", "2026-11-05 00:00:00", "12"),
              ("projects/p2", "2026-11-05 00:00:00", 7.5),
              ("projects/p3", "2026-11-05 00:00:00", 0)]


def answers(tally=TALLY, postgres=POSTGRES, clickhouse=CLICKHOUSE):
    return {name: {"q1": rows, "q2": rows}
            for name, rows in (("Tally", tally), ("PostgreSQL", postgres), ("ClickHouse", clickhouse))}


class Compare(unittest.TestCase):
    def test_the_same_answer_in_each_notation_agrees(self):
        self.assertEqual(cs.compare(answers()), [])

    def test_q1_rows_agree_whether_or_not_they_name_the_subject(self):
        named = {"q1": [["projects/p42", "2026-11-05T00:00:00Z", 3]], "q2": TALLY}
        unnamed = {"q1": [(None, "2026-11-05 00:00:00+00", "3")], "q2": POSTGRES}
        self.assertEqual(cs.compare({"Tally": named, "PostgreSQL": unnamed}), [])

    def test_a_changed_value_fails(self):
        changed = [POSTGRES[0], ("projects/p2", "2026-11-05 00:00:00+00", "7.51")]
        problems = cs.compare(answers(postgres=changed))
        self.assertEqual(len(problems), 2)  # Q1 and Q2
        self.assertIn("1 with another value", problems[1])

    def test_a_missing_or_extra_row_fails(self):
        problems = cs.compare(answers(clickhouse=CLICKHOUSE[:1]))
        self.assertTrue(any("1 rows missing" in p for p in problems), problems)
        extra = CLICKHOUSE + [("projects/p9", "2026-11-06 00:00:00", 1)]
        problems = cs.compare(answers(clickhouse=extra))
        self.assertTrue(any("1 extra" in p for p in problems), problems)

    def test_a_row_in_another_window_fails(self):
        moved = [("projects/p1", "2026-11-05 01:00:00", "12"), CLICKHOUSE[1]]
        self.assertNotEqual(cs.compare(answers(clickhouse=moved)), [])

    def test_an_empty_answer_fails_even_when_all_agree(self):
        self.assertNotEqual(cs.compare(answers(tally=[], postgres=[], clickhouse=[])), [])


if __name__ == "__main__":
    unittest.main()
