"""What benchmarks and tests share: real services (``services``: nanio, Postgres), brokers on sockets and as
processes (``brokers``), the whole stack for the broker benchmarks (``stack``), small valid packets
(``packets``), the ingestion teacher/student pair (``student_pair``) and the teacher probe corpus
(``teacher_data``). It ships with the benchmarks; tests import it, it never imports tests."""
