"""Reports: self-contained HTML pages that show attributions with their data."""

from datatrace.report.html import Section, label_agreement, q_dominance, write_report

__all__ = ["Section", "label_agreement", "q_dominance", "write_report"]
