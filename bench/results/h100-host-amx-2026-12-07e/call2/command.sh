source .devdeps/env.sh; L=$OUT/all.log; P="OMP_PLACES=cores OMP_PROC_BIND=close"
lscpu | grep -E 'Model name|^CPU\(s\)' | tr -s ' ' | tee -a $L
(cmake -S .base-src -B bb -G Ninja -DMOE_BACKEND=cpu -DCMAKE_BUILD_TYPE=Release -DMOE_BUILD_TESTS=OFF && cmake --build bb --target moe) >/tmp/bb.log 2>&1 || tail -20 /tmp/bb.log
(cmake -S . -B bn -G Ninja -DMOE_BACKEND=cpu -DCMAKE_BUILD_TYPE=Release -DMOE_BUILD_TESTS=ON && cmake --build bn) >/tmp/bn.log 2>&1 || tail -20 /tmp/bn.log
timeout 150 ctest --test-dir bn -R '^cpu' -LE huge --output-on-failure >$OUT/ctest.log 2>&1; echo ctest rc=$? | tee -a $L; grep -E "tests passed|Passed|Failed|Skipped" $OUT/ctest.log | tee -a $L
ab() { echo "== $*" | tee -a $L; timeout 200 ./bn/bench/pair_ab bb/libmoe.so bn/libmoe.so "$@" 2>&1 | grep -E '^host|^\| [mq]' | tee -a $L; }
OMP_NUM_THREADS=16 ab --tokens 1,16 --pairs 9
env OMP_NUM_THREADS=2 $P bash -c "$(declare -f ab); L=$L; ab --tokens 1,16,128,512 --pairs 7"
env OMP_NUM_THREADS=2 $P bash -c "$(declare -f ab); L=$L; ab --tokens 128,512 --pairs 5 --option cpu.kernels=avx512bf16"
OMP_NUM_THREADS=16 ab --tokens 128,512 --pairs 5 --option cpu.kernels=avx512bf16
