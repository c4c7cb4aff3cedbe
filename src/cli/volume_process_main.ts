// The program a volume process runs (volume_process.ts): `pcache serve` forks it, one per
// volume, with an IPC channel; it is not a command anyone runs by hand.

import { runVolumeProcess } from './volume_process.js';

runVolumeProcess();
