# Installs headers, both libraries, a CMake package (moe::moe, and
# moe::moe_static with its backend dependencies) and moe.pc.
include(CMakePackageConfigHelpers)
install(DIRECTORY include/ DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} FILES_MATCHING PATTERN "*.h")
install(TARGETS moe moe_static EXPORT moeTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT moeTargets NAMESPACE moe:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/moe)
configure_package_config_file(cmake/moeConfig.cmake.in ${CMAKE_CURRENT_BINARY_DIR}/moeConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/moe)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/moeConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/moeConfig.cmake
  ${CMAKE_CURRENT_BINARY_DIR}/moeConfigVersion.cmake DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/moe)
# moe.pc finds its prefix from its own location, so `cmake --install
# --prefix DIR` gives a working file wherever DIR is.
file(RELATIVE_PATH MOE_PC_TO_PREFIX "/prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/prefix")
configure_file(cmake/moe.pc.in ${CMAKE_CURRENT_BINARY_DIR}/moe.pc @ONLY)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/moe.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
