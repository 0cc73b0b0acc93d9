"""What people answer: the review file (a partition's flagged rows as a CSV a spreadsheet opens,
formula-looking cells guarded, and the same file read back however a spreadsheet saved it) and
the corrections table (an Iceberg table of their answers, the latest answer per text and scope).

    file         export_review, read_review_file
    corrections  Answers (what a label run applies), CorrectionsTable, the import's checks, the
                 audit estimate (Wilson interval)

May import the base only: both the label jobs and training read the answers.
"""
