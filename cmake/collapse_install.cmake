# Installs headers, libcollapse.so (collapse::collapse), libcollapse.a (collapse::collapse_static),
# the CUDA module when built, lib/cmake/collapse/ and lib/pkgconfig/collapse.pc.
# tests/install/ installs into a temporary prefix and builds an outside project against it.
include(CMakePackageConfigHelpers)

install(TARGETS collapse collapse_shared EXPORT collapseTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
if(TARGET collapse_cuda)
  install(TARGETS collapse_cuda LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
endif()
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/collapse DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

set(COLLAPSE_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/collapse)
install(EXPORT collapseTargets NAMESPACE collapse:: DESTINATION ${COLLAPSE_CMAKE_DIR})
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/collapseConfig.cmake.in
  ${PROJECT_BINARY_DIR}/collapseConfig.cmake INSTALL_DESTINATION ${COLLAPSE_CMAKE_DIR})
# The SONAME is libcollapse.so.<major>: a package of the same major version is compatible.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/collapseConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMajorVersion)
install(FILES ${PROJECT_BINARY_DIR}/collapseConfig.cmake ${PROJECT_BINARY_DIR}/collapseConfigVersion.cmake
  DESTINATION ${COLLAPSE_CMAKE_DIR})

# collapse.pc: relocatable (prefix from ${pcfiledir}, so `cmake --install --prefix P` anywhere works)
# when the install dirs are relative, the usual case.
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}")
  set(COLLAPSE_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
else()
  file(RELATIVE_PATH _collapse_up "/p/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/p")
  string(REGEX REPLACE "/$" "" _collapse_up "${_collapse_up}")
  set(COLLAPSE_PC_PREFIX "\${pcfiledir}/${_collapse_up}")
endif()
foreach(dir LIBDIR INCLUDEDIR)
  if(IS_ABSOLUTE "${CMAKE_INSTALL_${dir}}")
    set(COLLAPSE_PC_${dir} "${CMAKE_INSTALL_${dir}}")
  else()
    set(COLLAPSE_PC_${dir} "\${prefix}/${CMAKE_INSTALL_${dir}}")
  endif()
endforeach()
# The static link's dependencies: the lists of the top-level CMakeLists.txt (collapse::collapse_static).
list(JOIN COLLAPSE_STATIC_PC_REQUIRES " " COLLAPSE_PC_REQUIRES_PRIVATE)
list(TRANSFORM COLLAPSE_STATIC_SYSTEM_LIBS PREPEND "-l" OUTPUT_VARIABLE _collapse_pc_libs)
list(JOIN _collapse_pc_libs " " COLLAPSE_PC_LIBS_PRIVATE)
configure_file(${CMAKE_CURRENT_LIST_DIR}/collapse.pc.in ${PROJECT_BINARY_DIR}/collapse.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/collapse.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
