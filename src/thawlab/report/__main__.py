"""python -m thawlab.report"""
import sys

from thawlab.report.cli import main

sys.exit(main())
