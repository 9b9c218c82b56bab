"""What only the tests share: the models' own outputs, scrapes, closed loops, containers, the deployment files as
their tools read them, the leak guard. Starting real servers, nginx and Prometheus is harness/'s (the benchmarks
use it too). Test modules import from here and from harness, never from each other."""
