"""What the tests share: real server processes, the models' own outputs, loads and scrapes. Test modules import
from here, never from each other."""
