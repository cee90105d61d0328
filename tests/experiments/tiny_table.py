"""The tiny two-row table of the reproduce tests (conftest.py writes it to a temp folder)."""

TINY_TABLE = """\
paper: A tiny test table
source: tiny.txt
table: Table T
caption: resnet20 with and without SE on digits
defaults: {dataset: digits, num_classes: 10, input_size: 16, recipe: digits}
rows:
- name: ResNet20
  model: resnet20
  paper: {top1_err: {digits: 5.0}}
- name: ResNet20 + SE
  model: resnet20
  attention: se
  paper: {top1_acc: {digits: 96.0}}
"""
